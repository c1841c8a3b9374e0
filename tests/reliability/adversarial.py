"""Hypothesis strategies for hostile input, shared by the reliability tests.

Text includes what breaks naive code: lone surrogates, NUL, right-to-left marks, emoji,
the tokenizer's own special tokens, path separators and very long runs.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

NASTY_FRAGMENTS = [
    "", " ", "\n", "\t", "\x00", "\ud800", "\udfff", "\udcff", "\u202e", "\ufeff", "é", "模型", "🙂", "😀",
    "<image>", "</s>", "<s>", "<pad>", "<unk>", "USER:", "ASSISTANT:", "..", "../", "/", "\\", "%2e%2e", "~",
    "${HOME}", "{{x}}", "'", '"', "`", "\r\n", "-1", "1e309", "NaN", "null", "true", "[]", "{}",
]

# Every character category, surrogates included.
any_char = st.characters(exclude_categories=[])
nasty_text = st.one_of(
    st.text(any_char, max_size=40),
    st.lists(st.sampled_from(NASTY_FRAGMENTS), max_size=8).map("".join),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "<image>", "é", "\x00", "🙂"]), st.integers(1, 5000)),
)
numbers = st.one_of(
    st.integers(), st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, -1, 2**31, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-320, 1e308, float("inf")]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, nasty_text)


def json_like(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Nested lists/dicts of scalars (the shapes json.loads and yaml.safe_load produce)."""
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(nasty_text, children, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def nested_list(depth: int) -> Any:
    """[[[...]]] `depth` levels deep, built without recursion."""
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value
