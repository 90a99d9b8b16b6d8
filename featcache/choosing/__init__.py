"""``featcache choose``: which model, which taps, which head -- one answer, how sure, and at what cost.

Stage 9, above ranking and the sweep's probes (request -> run -> decide / answer). The funnel screens every
tap of every model with the scores and cheap baselines (``rank``'s machinery), confirms the survivors with the
batched probes by successive halving, and decides from paired out-of-fold predictions: the recommendation,
P(best), the tied set, the fast choice and how far each score can be trusted on this data.
"""
