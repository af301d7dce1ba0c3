"""The kinds of cache entry, one folder each under the cache root.

Kept apart from ``cache.py`` (and free of imports) so the command line can offer
them as choices without loading numpy or pandas.
"""

VOLUMES = "volumes"  # preprocessed volumes, one file per image
SEG_VOLUMES = "seg-volumes"  # whole volumes with their masks, one file per case
FEATURES = "features"  # frozen features of one manifest
TEXT = "text"  # frozen text embeddings

KINDS = (VOLUMES, SEG_VOLUMES, FEATURES, TEXT)
