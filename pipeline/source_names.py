"""The names by which a dataset source is chosen and its caches found: the annotation formats, and the environment
variables that carry the manifest and shard cache settings to every process a command starts. Plain constants, so
that the command lines can offer them without importing the readers."""

ANNOTATION_FORMATS = ("karpathy", "caption-json", "csv")
FORMATS = (*ANNOTATION_FORMATS, "webdataset")
MANIFEST_CACHE_ENV = "CUSA_MANIFEST_CACHE"
SHARD_CACHE_ENV = "CUSA_SHARD_CACHE"
SHARD_CACHE_GIB_ENV = "CUSA_SHARD_CACHE_GIB"
