"""Sizes of the shared demo fixtures (tests/conftest.py), importable by test modules."""

DEMO_IMAGES = 60  # 42 train / 9 val / 9 test images, 5 captions each
DEMO_CHUNK_ROWS = 16
DEMO_NEIGHBORS = 8
DEMO_SAMPLES_PER_SHARD = 4  # demo_shards: val and test 3 shards each, train 11
