"""The core: gathering, buckets, execution paths and state, for any face (see `core/engine.py`)."""
from .buckets import Bucket, buckets
from .engine import Core, Route
from .state import inner_optimizer

__all__ = ['Core', 'Route', 'Bucket', 'buckets', 'inner_optimizer']
