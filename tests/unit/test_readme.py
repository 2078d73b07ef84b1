from pathlib import Path

from tritonllm.tensors import tensor_table


def test_readme_tensor_table_is_the_rendered_one():
    """The README documents the tensors from the same specs the configs are rendered from."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert tensor_table() in readme
