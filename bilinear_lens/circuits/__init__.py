"""Circuits across the whole model: patching grids, attribution patching, exact pair
decompositions of bilinear MLPs over residual writers, attribution graphs without
transcoders, QK pair attributions and weight-based path interactions.

Exactness, stated once: a bilinear MLP ``f(x) = P((W x) * (V x))`` is homogeneous of degree
2, so ``f(x) = 1/2 J_f(x) x`` (Euler) and ``u . f(sum_c x_c) = sum_{c,d} x_c^T Q(u) x_d``.
With attention patterns and norm scales frozen at their values in the observed forward,
the whole model is then linear in the residual writers at that input, and attributions sum
exactly to the target. They are exact for the observed forward, not for counterfactuals
through the softmax or the norms; the symmetric split of a pair term is a convention, the
pair matrix itself is not.
"""
