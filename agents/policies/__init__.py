"""One file per policy; each registers itself with `agents.policy.register_policy`."""
