"""The candidates' prefix tree that thorough RAG-Sequence re-scoring decodes in one pass."""
import numpy as np
import pytest

from rag_jax.rag.decoding import prefix_tree

PAD = 1


def _check(cand: np.ndarray, size: int) -> None:
    tree = {k: np.asarray(v) for k, v in prefix_tree(cand, PAD, size).items()}
    c, t = cand.shape
    need = [max([j + 1 for j in range(t - 1) if cand[i, j + 1] != PAD], default=0) for i in range(c)]
    prefixes = {tuple(cand[i, : j + 1]) for i in range(c) for j in range(need[i])}
    assert int(tree["num_nodes"]) == len(prefixes)  # one node per distinct needed prefix
    owner = {}
    for i in range(c):
        for j in range(t - 1):
            n = int(tree["node"][i, j])
            if j >= need[i]:
                assert n == size  # no node: the spare slot
                continue
            assert n < len(prefixes)
            assert owner.setdefault(n, tuple(cand[i, : j + 1])) == tuple(cand[i, : j + 1])
            assert tree["tokens"][n] == cand[i, j] and tree["depth"][n] == j
            # attends to exactly its own prefix
            want = {int(tree["node"][i, q]) for q in range(j + 1)}
            assert set(np.flatnonzero(tree["ancestor"][n]).tolist()) == want


def test_hand_built_candidates():
    cand = np.array([
        [2, 0, 5, 6, 7, 2],
        [2, 0, 5, 6, 8, 2],       # shares 4 inputs with the first
        [2, 0, 5, 2, 1, 1],       # ends early
        [2, 0, 5, 6, 7, 2],       # duplicate: no new node
        [2, 9, 1, 4, 2, 1],       # a pad emitted mid-sequence still needs the nodes after it
        [2, 0, 5, 1, 1, 1],       # shorter than the early ender it shares a prefix with
    ])
    _check(cand, 16)
    assert int(prefix_tree(cand, PAD, 16)["num_nodes"]) == 9  # counted by hand


@pytest.mark.parametrize("seed", range(5))
def test_random_beams(seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(3, 6, (4, 9))
    cand = np.repeat(base, 3, axis=0)
    cand[:, 0] = 2
    cut = rng.integers(2, 9, len(cand))  # diverge at a random depth ...
    cand[np.arange(len(cand)), cut] = rng.integers(0, 6, len(cand))
    for i, e in enumerate(rng.integers(3, 10, len(cand))):  # ... and end at a random length
        if e < 9:
            cand[i, e], cand[i, e + 1:] = 2, PAD
    _check(cand, cand.shape[0] * (cand.shape[1] - 1))
