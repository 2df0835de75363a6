"""Stage names and signature domains of the wire protocol (the constants both parties share).

A round is ``join``, then the stages of its secure-aggregation mode (see
:mod:`fedproxy_secure.protocol.modes`), then ``done`` or ``aborted``. Every signature a party makes
is over ``domain || message`` with one of the domains below, so a signature for one purpose can
never be replayed as another.
"""

from __future__ import annotations

JOIN_STAGE = "join"
CONFIG_STAGE = "config"
RESULT_STAGE = "result"

# masking (Bonawitz et al.) stages
MASKING_STAGES = ("advertise", "share", "masked_input", "consistency", "unmask")
# plain (baseline) stage: the vector in the clear
PLAIN_STAGES = ("masked_input",)
# HE (CKKS) stages
HE_STAGES = ("he_keys", "he_input", "he_decrypt")
# SA-H-TIES: optional h reveal between the phases, phase-B stages carry this prefix
SA_REVEAL_STAGE = "sa_reveal"
SA_B_PREFIX = "b_"

ROUND_CONFIG_DOMAIN = b"fedproxy-secure/v1/round-config\n"
#: operator signature over the two SA-H-TIES phase messages (kept apart from round configs)
SA_PHASE_DOMAIN = b"fedproxy-secure/v1/sa-hties-phase\n"
#: HE key holder's signature over its public CKKS descriptor
HE_KEYS_DOMAIN = b"fedproxy-secure/v1/he-keys\n"
#: a client's signature over its HE envelope digest
HE_INPUT_DOMAIN = b"fedproxy-secure/v1/he-input\n"

DEFAULT_DEADLINES: dict[str, float] = {
    JOIN_STAGE: 30.0, "advertise": 120.0, "share": 20.0, "masked_input": 20.0, "consistency": 20.0,
    "unmask": 20.0, "he_keys": 120.0, "he_input": 30.0, "he_decrypt": 60.0, SA_REVEAL_STAGE: 20.0,
}
