"""Every loss and the RL maths, as pure functions over tensors (shapes in each docstring):

- :mod:`instructkit.losses.sft`: next-token cross-entropy (full and chunked), token log-probs,
  masked means, ``IGNORE_INDEX``;
- :mod:`instructkit.losses.preference`: reward-model ranking losses and centering, DPO and its
  variants (IPO, hinge, conservative), sequence log-probs, reward metrics;
- :mod:`instructkit.losses.rl`: PPO's clipped policy and value losses, KL estimators and
  controllers, GAE, whitening, score normalisation, the ptx mix;
- :mod:`instructkit.losses.group`: critic-free RL (GRPO, Dr. GRPO, RLOO, REINFORCE++): group
  advantages, the per-token clipped loss with an asymmetric clip, the three loss aggregations,
  KL estimators as loss terms.
"""
