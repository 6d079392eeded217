"""benchmarks/versus.py --parts: the union against each of its parts, per category, paired per question."""

from __future__ import annotations

import json
from pathlib import Path

import helpers

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "versus.py"


def write_answers(run: Path, method: str, speeds: dict[tuple[str, int], tuple[float, int]]) -> None:
    """One answer per (category, question id): 100 tokens at the given tokens/s in the given steps."""
    lines = []
    for (cat, qid), (tps, steps) in speeds.items():
        choice = {"turns": ["x"], "new_tokens": [100], "wall_time": [100 / tps], "decoding_steps": [steps]}
        lines.append(json.dumps({"question_id": qid, "category": cat, "choices": [choice]}))
    (run / "answers").mkdir(parents=True, exist_ok=True)
    (run / "answers" / f"{method}.jsonl").write_text("\n".join(lines) + "\n")


def test_the_parts_table_pairs_per_question_and_names_the_categories_lost(tmp_path):
    mod = helpers.load_script(SCRIPT, "versus")
    questions = [("rag", 1), ("rag", 2), ("rag", 3), ("writing", 4), ("writing", 5), ("writing", 6)]
    union = {q: (20.0, 40) for q in questions}
    retrieval = {q: (10.0, 50) if q[0] == "writing" else (25.0, 50) for q in questions}  # rag: retrieval wins
    jacobi = {q: (10.0, 90) for q in questions}
    write_answers(tmp_path, "tr-jacobi", union)
    write_answers(tmp_path, "retrieval", retrieval)
    write_answers(tmp_path, "jacobi", jacobi)
    table = mod.parts_table(tmp_path, "tr-jacobi", ["retrieval", "jacobi"])
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "0.80x [-5.00, -5.00] 0/3" in rows["rag"] and "2.00x [+10.00, +10.00] 3/0" in rows["writing"]
    assert "2.00x [+10.00, +10.00] 6/0" in rows["overall"], "jacobi: slower everywhere"
    assert rows["rag"].rstrip(" |").endswith("2.50 | 2.00"), "MAT 100/40 against the best part's 100/50"
    assert "to retrieval is below 1: 1 (rag)" in table and "to jacobi is below 1: 0 (none)" in table
