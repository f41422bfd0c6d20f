"""Content-addressed cache: staging, atomic publish, records, file-digest stat cache, locks."""

from qbuild.store.statcache import StatCache, hash_file
from qbuild.store.store import Entry, Store, default_cache_dir

__all__ = ["Entry", "StatCache", "Store", "default_cache_dir", "hash_file"]
