"""The web page: Sample, Inpaint / outpaint and Reconstruct tabs over an PageService (gradio Blocks).

`build_page(service)` returns the Blocks; movq_deploy.ui.app launches it on its own server or mounts it on a FastAPI
app. Handlers turn the service's ValueErrors into gr.Error, which the page shows as one line while the server
keeps serving. Images reach the browser as PNG (gradio's default, WebP, is lossy), so what the page shows is
exactly what the model made.
"""
from __future__ import annotations

import functools
import html
import inspect
import secrets
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from movq_deploy.images import extend_canvas, make_grid, mask_preview
from movq_deploy.ui.pictures import FITS, enlarge, fit_image, mask_from_layers, open_upload, token_picture
from movq_deploy.ui.service import PageService, SamplingOptions

# Offline-safe look: system fonts instead of the default theme's web fonts (servers here may have no internet).
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
EDITOR_SIDE = 256  # the editor shows a small image enlarged by a whole factor to about this many pixels
NO_CLASS = "none (unconditional)"
SIDES = ("left", "top", "right", "bottom")  # outpainting margins, in extend_canvas's order
DOWNLOAD_AGE_S = 3600  # sample PNGs are kept this long for the download button (gradio keeps its copies as long)


def shown_on_page(handler):
    """Errors (bad input, an overloaded or timed-out server) -> gr.Error: one line on the page; the server goes on."""
    @functools.wraps(handler)
    async def wrapped(*args, **kwargs):
        try:
            result = handler(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result
        except (ValueError, TypeError, OSError, RuntimeError) as error:
            raise gr.Error(html.escape(" ".join(str(error).split())), print_exception=False) from None

    return wrapped


class Page:
    """The components of the page and the handlers that connect them to one PageService."""

    def __init__(self, service: PageService):
        self.service = service
        self.info = service.info()
        self.scale = max(1, EDITOR_SIDE // self.info.image_size)  # editor pixels per image pixel
        self.downloads = Path(tempfile.mkdtemp(prefix="movq-deploy-ui-"))  # removed when the page goes
        weakref.finalize(self, shutil.rmtree, self.downloads, True)
        names = self.info.class_names or [f"class {i}" for i in range(self.info.num_classes)]
        self.class_choices = [NO_CLASS] + names

    def build(self) -> gr.Blocks:
        info = self.info
        cache = (DOWNLOAD_AGE_S, DOWNLOAD_AGE_S)  # gradio's copies of the images shown: checked and removed hourly
        with gr.Blocks(title="movq-deploy", analytics_enabled=False, delete_cache=cache) as blocks:
            gr.Markdown(f"### MoVQ sampling and editing\n{_describe(info)}", elem_id="model-info")
            with gr.Accordion("Sampling settings (all tabs)", open=True):
                with gr.Row():
                    self.class_name = gr.Dropdown(self.class_choices, value=NO_CLASS, label="class",
                                                  visible=info.num_classes > 0, elem_id="class")
                    self.steps = gr.Slider(1, max(64, info.defaults.steps), value=info.defaults.steps, step=1,
                                           label="steps", elem_id="steps")
                    self.temperature = gr.Slider(0.05, 3.0, value=info.defaults.temperature, step=0.05,
                                                 label="temperature", elem_id="temperature")
                    self.choice_temperature = gr.Slider(0.0, 10.0, value=info.defaults.choice_temperature, step=0.1,
                                                        label="choice temperature", elem_id="choice-temperature")
                    self.guidance_scale = gr.Slider(0.0, 10.0, value=info.defaults.guidance_scale, step=0.5,
                                                    label="guidance scale (0: unguided)", visible=info.guidance,
                                                    elem_id="guidance-scale")
            self.settings = [self.class_name, self.steps, self.temperature, self.choice_temperature,
                             self.guidance_scale]
            with gr.Tabs() as self.tabs:
                with gr.Tab("Sample", id="sample", elem_id="tab-sample"):
                    self._sample_tab()
                with gr.Tab("Inpaint / outpaint", id="edit", elem_id="tab-edit"):
                    self._edit_tab()
                with gr.Tab("Reconstruct", id="reconstruct", elem_id="tab-reconstruct"):
                    self._reconstruct_tab()
            self._connect_sample_to_editor()
        return blocks

    # ------------------------------------------------------------------------------------------------ sample
    def _sample_tab(self) -> None:
        with gr.Row():
            with gr.Column(scale=1):
                self.count = gr.Slider(1, self.info.max_images, value=16, step=1, label="images", elem_id="count")
                with gr.Row():
                    self.seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="seed", scale=3)
                    random_seed = gr.Button("random", elem_id="random-seed", scale=1, min_width=80)
                sample_button = gr.Button("Sample", variant="primary", elem_id="sample")
            with gr.Column(scale=2):
                self.grid = gr.Image(label="samples", type="numpy", format="png", interactive=False,
                                     elem_id="grid", buttons=["fullscreen"])
                self.sample_status = gr.Markdown(elem_id="sample-status")
                with gr.Row():
                    self.download = gr.DownloadButton("Download PNG", interactive=False, elem_id="download")
                    self.pick = gr.Number(1, precision=0, minimum=1, label="image #", elem_id="pick", scale=1)
                    self.send = gr.Button("Edit this image", interactive=False, elem_id="send-to-edit")
        self.samples = gr.State(None)  # uint8 [n, H, W, 3] of the last sampling, for "Edit this image"
        random_seed.click(lambda: secrets.randbits(31), outputs=self.seed)
        sample_button.click(self.sample, inputs=[self.count, self.seed, *self.settings],
                            outputs=[self.grid, self.sample_status, self.download, self.send, self.samples])

    @shown_on_page
    async def sample(self, count, seed, *settings):
        seed = secrets.randbits(31) if seed is None else _whole(seed, "seed")
        result = await self.service.sample(_whole(count, "the number of images"), seed, self._options(*settings))
        grid = np.asarray(make_grid(result.images))
        status = (f"{len(result.images)} images · seed **{result.seed}** · {self.info.backend} "
                  f"({self.info.precision}) · {result.seconds:.2f} s")
        return (grid, status, self._download_button(grid, result.seed),
                gr.Button(interactive=True), result.images)

    def _download_button(self, grid: np.ndarray, seed: int) -> gr.DownloadButton:
        """The grid as a PNG behind the download button; gradio serves a copy, so old files are removed."""
        for old in self.downloads.iterdir():
            if old.stat().st_mtime < time.time() - DOWNLOAD_AGE_S:
                shutil.rmtree(old, ignore_errors=True)
        path = Path(tempfile.mkdtemp(dir=self.downloads)) / f"samples-seed{seed}.png"  # a folder per request
        Image.fromarray(grid).save(path, format="PNG")
        return gr.DownloadButton(value=str(path), interactive=True)

    # ------------------------------------------------------------------------------------ inpaint / outpaint
    def _edit_tab(self) -> None:
        with gr.Row():
            with gr.Column(scale=1):
                self.edit_upload = gr.UploadButton("Upload an image to edit", type="filepath", elem_id="edit-upload")
                self.edit_fit = gr.Radio(list(FITS), value="crop", label="fit an image of another size",
                                         info="; ".join(f"{k}: {v}" for k, v in FITS.items()), elem_id="edit-fit")
                self.edit_note = gr.Markdown(elem_id="edit-note")
            with gr.Column(scale=2):
                self.editor = gr.ImageEditor(
                    label="paint the region to regenerate", type="numpy", image_mode="RGBA", format="png",
                    sources=(), transforms=(), layers=gr.LayerOptions(allow_additional_layers=False),
                    brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed", default_size=max(4, 4 * self.scale)),
                    elem_id="editor", height=EDITOR_SIDE + 160)
        with gr.Row():
            self.edit_seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="edit-seed")
            most = min(8, self.info.max_images)
            self.fills = gr.Slider(1, most, value=min(4, most), step=1, elem_id="fills",
                                   label="fills (fill i uses noise stream (seed, i))")
            self.paste_original = gr.Checkbox(True, label="keep the original pixels outside the mask",
                                              elem_id="paste-original")
            inpaint_button = gr.Button("Inpaint", variant="primary", elem_id="inpaint")
        with gr.Row():
            margins = [gr.Number(0, precision=0, minimum=0, label=f"{side} (px)", elem_id=f"extend-{side}")
                       for side in SIDES]
            outpaint_button = gr.Button("Outpaint", elem_id="outpaint")
        self.edit_results = gr.Gallery(label="input with the region to fill greyed, then the fills", format="png",
                                       columns=5, height="auto", elem_id="edit-results", interactive=False)
        self.edit_status = gr.Markdown(elem_id="edit-status")
        self.edit_image = gr.State(None)  # uint8 [H, W, 3]: the image being edited, at the model's size
        self.edit_upload.upload(self.load_for_edit, inputs=[self.edit_upload, self.edit_fit],
                                outputs=[self.editor, self.edit_image, self.edit_note])
        common = [self.edit_image, self.edit_seed, self.fills, self.paste_original, *self.settings]
        outputs = [self.edit_results, self.edit_status]
        inpaint_button.click(self.inpaint, inputs=[self.editor, *common], outputs=outputs)
        outpaint_button.click(self.outpaint, inputs=[*margins, *common], outputs=outputs)

    @shown_on_page
    def load_for_edit(self, path, fit):
        image, note = fit_image(open_upload(path), self.info.image_size, fit)
        return self._editor_value(image), image, note

    def _editor_value(self, image: np.ndarray) -> dict:
        shown = enlarge(image, self.scale)
        return {"background": shown, "layers": [], "composite": shown}

    @shown_on_page
    async def inpaint(self, editor, image, seed, fills, paste_original, *settings):
        image = _need_image(image)
        layers = (editor or {}).get("layers") or []
        mask = mask_from_layers(layers, image.shape[:2])
        return await self._edit(image, mask, seed, fills, paste_original, settings)

    @shown_on_page
    async def outpaint(self, left, top, right, bottom, image, seed, fills, paste_original, *settings):
        image = _need_image(image)
        margins = [_whole(value, side) for value, side in zip((left, top, right, bottom), SIDES)]
        if not any(margins):
            raise ValueError("all four margins are 0: give the border to extend, in pixels")
        canvas, border = extend_canvas(image, *margins, size=self.info.image_size)
        return await self._edit(np.asarray(canvas), np.asarray(border) >= 128, seed, fills, paste_original, settings)

    async def _edit(self, image, mask, seed, fills, paste_original, settings):
        seed = secrets.randbits(31) if seed is None else _whole(seed, "seed")
        result = await self.service.edit(image, mask, _whole(fills, "fills"), seed, self._options(*settings),
                                         bool(paste_original))
        gallery = [(mask_preview(image, mask), "input (grey: to fill)")]
        gallery += [(fill, f"fill {i} · seed {result.seed}") for i, fill in enumerate(result.images)]
        status = (f"{len(result.images)} fills · seed **{result.seed}** · {int(mask.sum())} pixels regenerated · "
                  f"{result.seconds:.2f} s")
        return gallery, status

    def _connect_sample_to_editor(self) -> None:
        self.send.click(self.take_sample, inputs=[self.samples, self.pick],
                        outputs=[self.editor, self.edit_image, self.edit_note, self.tabs])

    @shown_on_page
    def take_sample(self, samples, pick):
        if samples is None:
            raise ValueError("sample some images first")
        index = _whole(pick, "image #")
        if not 1 <= index <= len(samples):
            raise ValueError(f"image # must be between 1 and {len(samples)}, got {index}")
        image = np.asarray(samples[index - 1])
        return (self._editor_value(image), image, f"sample #{index} of the last grid",
                gr.Tabs(selected="edit"))

    # ----------------------------------------------------------------------------------------- reconstruct
    def _reconstruct_tab(self) -> None:
        zoom = f" (shown {self.scale}x larger)" if self.scale > 1 else ""
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.UploadButton("Upload an image to reconstruct", type="filepath",
                                         elem_id="reconstruct-upload")
                fit = gr.Radio(list(FITS), value="crop", label="fit an image of another size",
                               elem_id="reconstruct-fit")
                status = gr.Markdown(elem_id="reconstruct-status")
            with gr.Column(scale=2):
                with gr.Row():
                    original = gr.Image(label=f"input{zoom}", format="png", interactive=False,
                                        elem_id="reconstruct-input", buttons=["fullscreen"])
                    decoded = gr.Image(label=f"encoded, then decoded{zoom}", format="png", interactive=False,
                                       elem_id="reconstruct-output", buttons=["download", "fullscreen"])
                tokens = gr.Image(label="tokens: one colour per code, the c channels side by side", format="png",
                                  interactive=False, elem_id="reconstruct-tokens", buttons=["download", "fullscreen"])
        upload.upload(self.reconstruct, inputs=[upload, fit], outputs=[original, decoded, tokens, status])

    @shown_on_page
    async def reconstruct(self, path, fit):
        image, note = fit_image(open_upload(path), self.info.image_size, fit)
        result = await self.service.reconstruct(image)
        error = np.abs(result.image.astype(np.float64) - image.astype(np.float64))
        psnr = 10 * np.log10(255.0 ** 2 / max(float((error ** 2).mean()), 1e-10))
        h, w, c = result.tokens.shape
        status = f"{note} · PSNR {psnr:.1f} dB · tokens {h}x{w}x{c} · {result.seconds:.2f} s"
        cell = max(2, self.info.image_size * self.scale // (2 * h))  # panels half as tall as the images shown
        return (enlarge(image, self.scale), enlarge(result.image, self.scale),
                token_picture(result.tokens, self.info.codebook_size, cell=cell), status)

    # --------------------------------------------------------------------------------------------- shared
    def _options(self, class_name, steps, temperature, choice_temperature, guidance_scale=None) -> SamplingOptions:
        """The settings row as SamplingOptions; guidance_scale None (a caller without that slider) takes the model's
        default."""
        if class_name not in self.class_choices:
            raise ValueError(f"unknown class {class_name!r}")
        label = None if class_name == NO_CLASS else self.class_choices.index(class_name) - 1
        guidance = None if guidance_scale is None else float(guidance_scale)
        return SamplingOptions(steps=_whole(steps, "steps"), temperature=float(temperature),
                               choice_temperature=float(choice_temperature), class_label=label,
                               guidance_scale=guidance)


def build_page(service: PageService) -> gr.Blocks:
    """The page over a service; launch it (movq_deploy.ui.app.launch) or mount it on a FastAPI app."""
    return Page(service).build()


def _describe(info) -> str:
    h, w, c = info.grid
    classes = f"{info.num_classes} classes" if info.num_classes else "unconditional"
    return (f"{info.backend} ({info.precision}) · {info.image_size}x{info.image_size} images · tokens {h}x{w}x{c} "
            f"from {info.codebook_size} codes · {classes}")


def _whole(value, name: str) -> int:
    if value is None or float(value) != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def _need_image(image):
    if image is None:
        raise ValueError("upload an image first (or take one from the Sample tab)")
    return np.asarray(image)
