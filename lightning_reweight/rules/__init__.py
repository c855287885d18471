"""Weight rules: per-sample losses (and rule state) -> non-negative weights.

``create_rule(name, **kwargs)`` builds a rule object from the registry ``RULES``; an unknown name raises with
the valid ones. A rule is a callable ``rule(losses) -> weights`` with ``state_dict``/``load_state_dict`` for
anything it keeps across steps.
"""

from lightning_reweight.rules.instance import (
    clip_weights,
    effective_sample_size,
    extremes_score,
    kl_dro_weights,
    linupper_score,
    loss_based_weights,
    minmax_normalize,
    quadratic_score,
    softmax_weights,
)
from lightning_reweight.rules.registry import (
    RULES,
    KLDRORule,
    LossBasedRule,
    Rule,
    UniformRule,
    create_rule,
    register_rule,
)

__all__ = [
    "RULES",
    "Rule",
    "UniformRule",
    "LossBasedRule",
    "KLDRORule",
    "create_rule",
    "register_rule",
    "clip_weights",
    "effective_sample_size",
    "extremes_score",
    "kl_dro_weights",
    "linupper_score",
    "loss_based_weights",
    "minmax_normalize",
    "quadratic_score",
    "softmax_weights",
]
