"""Examples run in the suite (small sizes): they must keep working as the API changes."""


def test_custom_model_trains_with_both_optimizers(example):
  result = example("custom_model").main(num_labels=3_000, steps=80, points=3_000,
                                        log=lambda m: None)
  chance = 1 / 3_000
  for path in ("slidejax", "nnx"):
    assert result[path]["p@1"] > 100 * chance, result
  # the row-sparse path learns like the dense one
  assert abs(result["slidejax"]["p@1"] - result["nnx"]["p@1"]) < 0.15, result
