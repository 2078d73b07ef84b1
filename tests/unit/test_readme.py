from pathlib import Path

from tritonllm.tensors import tensor_table


def test_tensor_table_is_the_rendered_one():
    """docs/tensors.md documents the tensors from the same specs the configs are rendered from."""
    root = Path(__file__).resolve().parents[2]
    assert tensor_table() in (root / "docs" / "tensors.md").read_text()
    assert "docs/tensors.md" in (root / "README.md").read_text()
