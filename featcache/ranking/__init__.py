"""Ranking: which pretrained model, which of its layers? Many backbones' taps scored, nothing trained.

Stage 8 of 9 (data -> backbones -> extraction -> runs -> fuse -> finetuning, sweeping -> **ranking** ->
reporting). Resolves name patterns to models, extracts them group by group through the extraction stage,
scores every tap with the sweep's transferability scores, optionally confirms the best with its probes
(Kendall tau per score), and hands the report a folder (``runs/ranks/NAME``) of tables.
"""
