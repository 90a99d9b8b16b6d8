"""Linear probes solved on the device, shared by fuse-train, the sweep, rank --confirm and choose.

Below the stages that fit heads (flow: runs -> **solvers** -> fuse -> sweeping): :mod:`lanes` (every C of many
tap combinations' logistic regressions in one batched L-BFGS), :mod:`path` (one combination's C path, warm-started:
the squared hinge's way; the rotation into the row space both use), :mod:`hinge` and :mod:`hinge_rows` (the squared
hinge's exact Newton steps, by features or by rows).
"""
