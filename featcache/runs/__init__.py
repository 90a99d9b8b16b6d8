"""Runs: the run record schema, run folders, the comparison table, and predictions with a run.

Stage 4 of 8, below the stages that write runs (extraction -> **runs** -> fuse, finetuning,
sweeping -> reporting): it knows no model. ``records`` writes and reads a run folder (the model's
files through a callable the writing stage hands it), ``comparison`` labels and tables runs,
``predict`` dispatches to the predictor each run kind registers.
"""
