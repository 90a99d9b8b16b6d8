"""Reporting: one self-contained HTML page (and CSV) from run folders.

Last stage (records -> **reporting**). ``page`` renders the template (autoescaped),
``figures`` draws, ``explain`` computes Grad-CAM. Reads run records; writes nothing else.
"""
