"""Backbones: the registry of declared networks with their taps, and the tap model that runs one.

Second stage (data -> **backbones** -> extraction). Hands the next stages a network cut at
its taps (``tap_model``), the pooling, and the device/precision rules. Imports only data
and errors.
"""
