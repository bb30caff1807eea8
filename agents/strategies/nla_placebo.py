"""`nla-placebo`: the `nla` strategy (same tools, prompt, budgets and policy handling) whose
verbalize explains a base-model activation of an ordinary shipped text instead of the
target's (`tools.sources`, "placebo"). The control arm of the benchmark: what an NLA-equipped
auditor finds when the explanations cannot carry the organism."""

import dataclasses

from . import register_strategy
from .nla import NLA

NLA_PLACEBO = register_strategy(dataclasses.replace(
    NLA,
    name="nla-placebo",
    description="the nla strategy, but verbalize explains activations that are not the target's (control)",
    verbalize_source="placebo",
    shown_as=NLA.name,  # the policy must not be able to tell it is the placebo
))
