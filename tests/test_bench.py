"""bench.py runs end to end with tiny settings and prints its table (no timing is asserted)."""
import json

import bench

TINY = ["--device", "cpu", "--arch", "vit_tiny", "--patch_size", "8", "--embed_dim", "32", "--depth", "1",
        "--num_heads", "2", "--out_dim", "64", "--head_hidden_dim", "64", "--head_bottleneck_dim", "32",
        "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2", "--batch_size", "4",
        "--steps", "2", "--warmup", "1", "--num_workers", "0", "--data_batches", "1", "--augment_images", "2",
        "--num_photos", "4", "--photo_size", "64", "48", "--repeats", "1"]


def test_bench_prints_its_table_and_writes_json(tmp_path, capsys):
    output = tmp_path / "bench.json"
    rows = bench.main(bench.get_args_parser().parse_args(
        TINY + ["--fused_loss", "true", "false", "--gpu_augment", "false", "true", "--json", str(output)]))
    table = capsys.readouterr().out
    assert "| part | setting | img/s |" in table
    parts = [row["part"] for row in rows]
    assert parts.count("step") == 4 and parts.count("data") == 2 and parts.count("augment") == 3
    assert parts.count("matching") == 1
    for row in rows:
        assert row["img_per_s"] > 0 and f"| {row['part']} | {row['setting']} |" in table
    assert any("stock torchvision" in row["setting"] for row in rows)
    saved = json.loads(output.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["device"].startswith("CPU")
