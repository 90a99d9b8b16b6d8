"""Fuse: select cached taps, normalise each, concatenate, and train interchangeable heads.

Fourth stage (extraction -> **fuse** -> records -> reporting). ``fusion`` builds the fused
matrix, ``heads`` the estimators, ``evaluate`` the honest splits and metrics, ``stream`` the
out-of-core path, ``train`` the fuse-train run. Hands run folders to records.
"""
