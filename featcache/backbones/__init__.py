"""Backbones: the registry of declared networks with their taps, discovery of any other, and the tap model.

Stage 2 of 8 (data -> **backbones** -> extraction). Hands the next stages a network cut at
its taps (``tap_model``), the pooling, and the device/precision rules. Imports only data
and errors.
"""
