"""What the field compares against, as training options of any strategy: replay, weight averaging (WiSE-FT, EMA),
sparse task vectors and the diagonal Fisher (EWC)."""
