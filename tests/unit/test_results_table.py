"""The results files the benches write (`bench.measure.write_results`)."""


def test_results_table_has_the_columns_of_every_row(tmp_path):
    """Benches whose rows differ (the norms by warps, the activation by form) keep every column."""
    from bench.measure import write_results

    rows = [{"kernel": "add + norm", "us, 4 warps": 1.8}, {"kernel": "activation", "us, one block": 3.0}]
    table = write_results(tmp_path, "rows", {}, rows)
    assert table.splitlines()[0] == "| kernel | us, 4 warps | us, one block |"
    assert table.splitlines()[3] == "| activation |  | 3.0 |"
    assert next(tmp_path.glob("*-rows.md")).read_text().endswith(table + "\n")
