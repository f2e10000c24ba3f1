"""Infrastructure shared by every layer: atomic files and Hub uploads, optional extras, shipped assets and package
data, peak memory, deprecations. Nothing here imports torch at module level but io."""
