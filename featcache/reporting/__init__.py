"""Reporting: one self-contained HTML page (and CSV) from run and sweep folders.

Stage 8 of 8 (runs, sweeping -> **reporting**). ``page`` renders the template (autoescaped),
``figures`` draws, ``explain`` computes Grad-CAM, ``sweeps`` the sweep section. Reads run
records; writes nothing else.
"""
