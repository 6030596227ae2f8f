"""The image task: `image-cls`, and the image processor and sizes of a new vision model."""

import sys
from dataclasses import dataclass
from pathlib import Path

from ... import data as byte_data
from ...errors import TaskError, first_line
from ..metrics import classification_metrics
from .base import Task, TaskData, encode_labels, limit_rows


def image_processor_for(image_size: int, num_channels: int):
    """A pure-PIL image processor (no torchvision needed) that resizes to the model's size and scales to [-1, 1]."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5] * num_channels,
        image_std=[0.5] * num_channels,
        do_convert_rgb=num_channels == 3,
    )


def processed_size(processor, channels: int = 3) -> tuple[int, int] | None:
    """(height, width) of the `pixel_values` an image processor makes of an image (a blank 8 x 8 one in the model's
    mode: RGB, or L for one channel); None when it cannot process one."""
    from PIL import Image

    try:
        image = Image.new("L" if channels == 1 else "RGB", (8, 8))
        pixels = processor(image, return_tensors="pt")["pixel_values"]
    except Exception:
        return None
    return tuple(int(n) for n in pixels.shape[-2:])


@dataclass(frozen=True)
class ImageClassification(Task):
    """Images converted to RGB (as transformers' image pipelines do), so a new model has 3 input channels even for
    grey-scale data such as the digits, and `pipeline("image-classification")` works on it. A model built from an
    architecture name takes its image size from the data, and a patch size giving at most `max_tokens` tokens."""

    max_tokens: int = 256
    modality = "image"
    remove_unused_columns = False  # the transform yields pixel_values from the image column

    def check_config(self, config, name):
        if config.get("image_size") is None:
            raise TaskError(f"model {name!r} is not a vision model (no image_size): it cannot do {self.name!r}")

    def load_processing(self, folder, own, config=None):
        """The image processor saved in `folder`, else one for the image size of `config` (None without one: a new
        model sized from the data gets one in `load_data`). A preset's processor (`own` False) serves only a config
        of the preset's image size: one changed by `--config-overrides` gets a processor for its own size."""
        from transformers import AutoImageProcessor

        byte_data.require("PIL", byte_data.IMAGE_REQUIREMENTS["PIL"], "the image-cls task")
        size = (config or {}).get("image_size")
        channels = (config or {}).get("num_channels") or 3
        if folder is not None and (Path(folder) / "preprocessor_config.json").is_file():
            try:
                processor = AutoImageProcessor.from_pretrained(folder)
            except Exception as error:
                raise TaskError(f"cannot load the image processor of {folder!r}: {first_line(error)}") from error
            if own or not size or processed_size(processor, channels) == (size, size):
                return processor
        if size:
            return image_processor_for(size, channels)
        return None

    def load_data(
        self, args, processing, config, train=True, seed=42, sized_by_data=False, config_class=None, new_model=False
    ):
        """`sized_by_data`: a new model whose image size, channels and patch size come from the data. Images of
        another size than the model's are an error for a new model (`new_model`: a preset's size must match the
        data), and resized by a checkpoint's own image processor where it brings them to the model's size."""
        from transformers import DefaultDataCollator

        if args.dataset is None:
            train_set, validation = byte_data.digits_dataset(seed=0)
            description = "scikit-learn handwritten digits (8x8 grey-scale, 10 classes; embedded)"
            source = "the digits"
        else:
            columns = dict(image_column=args.image_column, label_column=args.label_column)
            train_set, validation = self.local_splits(args, seed, **columns)
            if args.image_column != "image":
                train_set, validation = (d.rename_column(args.image_column, "image") for d in (train_set, validation))
            train_set, validation, _ = encode_labels(train_set, validation, args.label_column)
            description = f"local image dataset {args.dataset}"
            source = f"dataset {args.dataset!r}"
        train_set = limit_rows(train_set, getattr(args, "max_train_samples", None))
        validation = limit_rows(validation, args.max_eval_samples)
        label_feature = train_set.features["label"]
        label_names = list(label_feature.names) if hasattr(label_feature, "names") else None
        if label_names is None:
            label_names = [str(i) for i in range(int(max(train_set["label"])) + 1)]

        size = _image_size(train_set, source)
        for split in (train_set, validation):
            _check_images(split, size, source)
        if sized_by_data:
            channels = 3
            updates = self.sized_config(config, size, channels, config_class)
        else:
            channels, updates = config.get("num_channels", 3), {}
            expected = config["image_size"]
            if size != expected:
                resized = None if new_model or processing is None else processed_size(processing, channels)
                if resized != (expected, expected):
                    raise TaskError(
                        f"{source} has {size}x{size} images, but the model expects {expected}x{expected} (its "
                        "config's image_size)"
                        + (f" and its image processor makes them {resized[1]}x{resized[0]}" if resized else "")
                    )
                print(
                    f"hf-efficient: {source} has {size}x{size} images: the model's image processor resizes them to "
                    f"{expected}x{expected} (its config's image_size)",
                    file=sys.stderr,
                )
        processor = processing or image_processor_for(size, channels)

        def transform(batch):
            out = processor([_as_mode(image, channels) for image in batch["image"]], return_tensors="pt")
            out["labels"] = batch["label"]
            return out

        train_set.set_transform(transform)
        validation.set_transform(transform)
        return TaskData(
            train_set if train else None,
            validation,
            description,
            processor,
            collator=DefaultDataCollator(),
            compute_metrics=classification_metrics,
            label_names=label_names,
            config_updates=updates,
        )

    def sized_config(self, config: dict, size: int, channels: int, config_class=None) -> dict:
        """Image size and channels from the data; where the config has them, the smallest patch size that gives
        at most `max_tokens` patches (unless set) and `max_position_embeddings` = the number of tokens: the
        patches plus the tokens the config adds to them (`extra_tokens`, e.g. a class token)."""
        updates = {"image_size": size, "num_channels": channels}
        tokens = size * size
        if "patch_size" in config:
            patch = config.get("patch_size") or next(
                (p for p in range(2, size + 1) if size % p == 0 and (size // p) ** 2 <= self.max_tokens), size
            )
            updates["patch_size"] = patch
            tokens = (size // patch) ** 2
        if "max_position_embeddings" in config:
            updates["max_position_embeddings"] = tokens + extra_tokens(config_class, {**config, **updates})
        return updates


def extra_tokens(config_class, values: dict) -> int:
    """Tokens a vision config adds to its patches, read from the config class without building (validating) it:
    a `num_extra_tokens` attribute, else 1 where a `uses_class_token` property is true (AFT's DeiT-style class
    token), else 0. Any architecture declaring either gets a model that fits its data, with no branch here."""
    if config_class is None:
        return 0
    probe = config_class.__new__(config_class)  # the values as attributes, so the class's properties can read them
    probe.__dict__.update(values)
    try:
        count = getattr(probe, "num_extra_tokens", None)
        if count is None:
            count = 1 if getattr(probe, "uses_class_token", False) is True else 0
        return int(count)
    except (AttributeError, TypeError, ValueError):
        return 0


def _as_mode(image, channels: int):
    if channels == 1 and image.mode != "L":
        return image.convert("L")
    if channels == 3 and image.mode != "RGB":
        return image.convert("RGB")
    return image


def _image_size(dataset, source: str) -> int:
    width, height = dataset[0]["image"].size
    if width != height:
        raise TaskError(f"{source} has {width}x{height} images: square images are needed (image_size)")
    return width


def _check_images(dataset, size: int, source: str, limit: int = 2000) -> None:
    """Every image (the first `limit` of each split) must have the same size."""
    column = dataset.select(range(min(len(dataset), limit)))["image"]
    for index, image in enumerate(column):
        if image.size != (size, size):
            raise TaskError(
                f"{source}: image {index} is {image.size[0]}x{image.size[1]}, but the others are {size}x{size}"
            )
