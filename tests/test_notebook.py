"""notebooks/ablations.ipynb runs end to end (tiny sizes) so it cannot rot."""
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "ablations.ipynb"

# Small enough for a few CPU-minutes: a world of a few hundred passages, 4 steps per run.
TINY = dict(world=dict(num_people=24, num_orgs=8, num_cities=8, num_countries=3, num_rivers=4),
            reader_worlds=1, warmup_short_steps=2, warmup_steps=4, steps=4, batch=4, n_docs=2, eval_examples=8,
            test_k=[1, 2])


@pytest.mark.slow
def test_ablations_notebook_runs_and_prints_table(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    try:
        from rag_jax.demo.run import minilm_dir

        minilm_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))

    work = tmp_path / "work"
    monkeypatch.setenv("RAG_JAX_NOTEBOOK_PARAMS", json.dumps({**TINY, "workdir": str(work)}))
    # The kernel inherits this process's environment: one CPU device, not conftest's eight fake ones.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "").strip())
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, tmp_path / "ablations.executed.ipynb")  # kept for debugging a failure

    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
        if o.get("output_type") == "stream"
    )
    assert "| run | k | test EM |" in outputs
    for label in ("RAG-Sequence (learned retriever)", "RAG-Token (learned retriever)",
                  "RAG-Sequence (frozen retriever)", "closed-book BART", "RAG-Sequence (frozen BM25 retriever)",
                  "k=1 at test time", "k=2 at test time", "| FEVER run (test claims) |",
                  "| fever_rag_sequence | learned |", "| fever_rag_sequence_frozen | frozen |"):
        assert label in outputs, label
    table = (work / "ablations.md").read_text()
    qa, fever = table.split("\n\n")
    assert len([l for l in qa.splitlines() if l.startswith("| ")]) == 1 + 5 + len(TINY["test_k"])
    assert len([l for l in fever.splitlines() if l.startswith("| ")]) == 1 + 2
    res = json.loads((work / "ablations.json").read_text())
    assert set(res["runs"]) == {"rag_sequence", "rag_token", "rag_sequence_frozen", "closed_book", "rag_sequence_bm25"}
    for run in res["runs"].values():
        assert 0.0 <= run["exact_match"] <= 1.0 and run["examples"] == TINY["eval_examples"]
    # The BM25 run retrieved from the BM25 index (its manifest says so) and reports retrieval recall.
    manifest = json.loads((work / "index_bm25" / "manifest.json").read_text())
    assert manifest.get("kind") == "bm25", manifest.get("kind")
    assert 0.0 <= res["runs"]["rag_sequence_bm25"]["gold_recall@1"] <= 1.0
    assert set(res["fever"]) == {"fever_rag_sequence", "fever_rag_sequence_frozen"}
    for run in res["fever"].values():
        assert 0.0 <= run["label_accuracy"] <= 1.0 and 0.0 <= run["label_accuracy_2way"] <= 1.0
    # Retrieval runs report answer recall; k=2 documents can only recall more than k=1.
    assert res["test_k"]["2"]["recall@2"] >= res["test_k"]["1"]["recall@1"]
    assert "recall@1" not in res["runs"]["closed_book"]
    png = work / "ablations.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
