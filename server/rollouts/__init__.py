"""Rollouts: one engine for canary, all-at-once (and, to come, shadow, A/B, blue-green).

``spec`` holds the rollout specification and the gate definitions with their
bounded defaults; ``cohorts`` the deterministic, class-stratified choice of
the devices of each wave; ``gates`` the pure statistical gates; ``policy``
the pure decision core (spec + state + evidence + clock in; next state and
actions out) that a controller runs under the shared lease. docs/rollouts.md
describes strategies, gates, states and the revert.
"""
