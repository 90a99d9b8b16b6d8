"""Extraction: every tap of every backbone, once, into a fingerprinted, resumable HDF5 cache.

Third stage (backbones -> **extraction** -> fuse / finetuning). ``run.extract`` makes sure a
finished cache exists per backbone (one shared pass over the data); ``store`` is the file
format; ``distributed`` the torchrun sharding. Hands the next stages cache files.
"""
