"""What decides weights: pure functions, no Lightning.

* ``instance`` — per-sample losses -> weights (LinUpper / Quadratic / Extremes, KL-DRO); ``create_rule(name,
  **kwargs)`` builds one from the registry ``RULES`` (an unknown name raises with the valid ones;
  ``rule_arguments(name)`` lists the arguments a rule takes). A rule is a callable ``rule(losses) -> weights``
  with ``state_dict``/``load_state_dict`` for anything it keeps; a stateful rule splits a step into a pure
  ``propose(losses) -> (weights, pending)`` and ``commit(pending)``, so a rejected step changes nothing.
* ``balance`` — class/group temperature distributions, upweight factors, the Cooldown schedule, and
  ``check_groups``, the one validator of group/class ids (re-exported by ``fairness``).
* ``importance`` — importance-sampling scores, probabilities with a uniform floor, unbiasing weights.
* ``fairness`` — GroupDRO and FEBS group weights, FEBS-Dice.
* ``adawac`` — AdaWAC's mirror-descent step.
* ``tta`` — EATA/Tent entropy filters, sample weights, Fisher penalty.
"""

from lightning_reweight.rules.adawac import adawac_mirror_step
from lightning_reweight.rules.balance import (
    TemperatureSchedule,
    cooldown_tau,
    create_schedule,
    temperature_distribution,
    upweight_factors,
)
from lightning_reweight.rules.fairness import febs_group_scales, febs_loss_multipliers, group_dro_update
from lightning_reweight.rules.importance import gradnorm_score, importance_probabilities, unbiasing_weights
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
    rule_arguments,
)
from lightning_reweight.rules.tta import eata_select, entropy_margin, fisher_penalty, softmax_entropy

__all__ = [
    "adawac_mirror_step",
    "TemperatureSchedule",
    "cooldown_tau",
    "create_schedule",
    "eata_select",
    "entropy_margin",
    "febs_group_scales",
    "febs_loss_multipliers",
    "fisher_penalty",
    "gradnorm_score",
    "group_dro_update",
    "importance_probabilities",
    "softmax_entropy",
    "temperature_distribution",
    "unbiasing_weights",
    "upweight_factors",
    "RULES",
    "Rule",
    "UniformRule",
    "LossBasedRule",
    "KLDRORule",
    "create_rule",
    "register_rule",
    "rule_arguments",
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
