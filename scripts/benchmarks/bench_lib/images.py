"""Images mode: image-classification throughput (images/s) of a training step and of inference, for every entry
that declares an `image` level (vision-only architectures included), beside transformers' ViT with SDPA at the same
width, depth, heads, FFN size, image and patch size.

Training step = forward + cross-entropy + backward + AdamW step; inference = one `torch.no_grad()` forward in eval
mode. Both are medians of the timed repeats after a warm-up, over the same random batch.
"""

import time

from . import measure, specs


def image_point(entry: dict, sizes: dict, batch: int, device: str, repeats: int, time_target: float) -> dict:
    import torch

    torch.manual_seed(0)
    config = specs.level_config(entry, "image", sizes)
    model = specs.build_model(entry, config, "AutoModelForImageClassification").to(device)
    c = model.config
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=generator).to(device)
    labels = torch.randint(0, c.num_labels, (batch,), generator=generator).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        model(pixel_values=pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer():
        with torch.no_grad():
            model(pixel_values=pixels)

    model.train()
    train = measure.timed_repeats(train_step, device, repeats, time_target)
    model.eval()
    inference = measure.timed_repeats(infer, device, repeats, time_target)
    return {
        "status": "ok",
        "batch": batch,
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "parameters": specs.count_parameters(model),
        "train_step_s": round(train["time_s"], 5),
        "inference_s": round(inference["time_s"], 5),
        "train_images_per_s": round(batch / train["time_s"], 2),
        "inference_images_per_s": round(batch / inference["time_s"], 2),
    }


def run(entries, sizes, batch, device, repeats, time_target, log=print) -> list[dict]:
    rows = []
    for entry in entries:
        record = {"name": entry["name"], "model_type": entry["model_type"]}
        start = time.perf_counter()
        try:
            record.update(image_point(entry, sizes, batch, device, repeats, time_target))
        except Exception as error:
            record.update(measure.failure(error))
        record["wall_s"] = round(time.perf_counter() - start, 2)
        rows.append(record)
        log(
            f"  images {entry['name']:18s} {record['status']:6s} "
            + measure.outcome(
                record,
                lambda r: f"train {r['train_images_per_s']} img/s, inference {r['inference_images_per_s']} img/s",
            )
        )
    reference = next((r for r in rows if r["name"] == specs.IMAGE_REFERENCE and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] == "ok" and reference:
            row["train_ratio_vs_reference"] = round(row["train_images_per_s"] / reference["train_images_per_s"], 3)
            row["inference_ratio_vs_reference"] = round(
                row["inference_images_per_s"] / reference["inference_images_per_s"], 3
            )
    return rows
