"""The domains em-bench scores in.

Refusal is scored in seven responsible-AI domains: em-bench's own list, which the organism's
world's requests and every RAI suite (data/rai_suites/) map onto. Any other domain is a task's
to name: the organism's world is one provider of domains and questions (its advice and open
domains form the default out-of-domain suite), a task's own question files another.
"""

from __future__ import annotations

RAI_DOMAINS = ("cybersecurity", "safety", "toxicity", "bias", "sensitive_content",
               "medical_legal", "privacy")
RAI_SHORT = {"cybersecurity": "cyber", "safety": "safety", "toxicity": "toxic", "bias": "bias",
             "sensitive_content": "sensitive", "medical_legal": "med/legal", "privacy": "privacy"}


# The organism's out-of-domain suite in two halves. Whatever shapes a defense (tuning its
# strength, discovering its latents, training SAEs, its extra data) may draw on the development
# domains, less the task's own; the headline EM is taken on the held-out ones, which none of
# that touches, so a defense cannot be scored on what it was fitted to.
DEVELOPMENT_DOMAINS = ("finance", "medical", "legal", "code")
HELD_OUT_DOMAINS = ("home", "travel", "fitness", "open")


def is_rai(domain: str) -> bool:
    """Whether `domain` is one of the seven responsible-AI domains."""
    return domain in RAI_DOMAINS
