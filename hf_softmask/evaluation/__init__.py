"""How results are judged: continual-learning metrics, the document/seed resampling behind the frontier's
intervals, and the plots."""
