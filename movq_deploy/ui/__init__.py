"""The web page (gradio) for sampling, inpainting / outpainting and reconstruction: `movq-deploy ui`.

Needs the `ui` extra (gradio). Nothing in the rest of movq_deploy imports this package; `service` and `pictures`
import no gradio, so a server can implement PageService without it.
"""
