"""The core: gathering, buckets, execution paths and state, for any face (see `core/engine.py`)."""
from .buckets import Bucket, buckets
from .engine import Core, Route, Routed, routes_of
from .state import inner_optimizer

__all__ = ['Core', 'Route', 'Routed', 'routes_of', 'Bucket', 'buckets', 'inner_optimizer']
