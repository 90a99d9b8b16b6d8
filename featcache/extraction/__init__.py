"""Extraction: every tap of every backbone, once, into a fingerprinted, resumable HDF5 cache.

Stage 3 of 8 (backbones -> **extraction** -> runs, fuse). ``request`` is what a user asks for,
``config`` the fingerprint and each request's cache identity, ``run.extract`` makes sure a
finished cache exists per backbone (one shared pass over the data), ``store`` is the file
format, ``distributed`` the torchrun sharding. Hands the next stages cache files.
"""
