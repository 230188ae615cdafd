"""`LLM.chat`'s messages, as OpenAI and vLLM write them, -> the messages a chat template renders and the pictures
and videos they carry, in order. Content parts: `text`; `image_url` (a `data:` URL, or a `file://` URL or path
inside `allowed_local_media_path`); `image_pil` (a PIL image); `video_url` (a local video file, as for images).
Nothing is downloaded: an `http(s)://` URL is refused."""
import base64
import binascii
import io
import os
from urllib.parse import unquote, urlparse

from PIL import Image, ImageOps

from vllm_utils.errors import UserError


def parse_messages(messages: list[dict], media_root: str | None) -> tuple[list[dict], list[Image.Image], list]:
    """(the messages with each picture or video as a `{"type": "image"}` / `{"type": "video"}` part, the pictures,
    the videos)."""
    rendered, images, videos = [], [], []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"a chat message is a dict with 'role' and 'content', got {message!r}"[:200])
        content = message["content"]
        if not isinstance(content, (str, list)):
            raise UserError(f"a chat message's content is a string or a list of parts, got {type(content).__name__}")
        if isinstance(content, str):
            rendered.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "image_pil"):
                images.append(part["image_pil"].convert("RGB") if kind == "image_pil" else
                              _image(_url(part["image_url"]), media_root))
                parts.append({"type": "image"})
            elif kind == "video_url":
                videos.append(_video(_url(part["video_url"]), media_root))
                parts.append({"type": "video"})
            else:
                raise UserError(f"chat content part of type {kind!r} is not supported here (text, image_url, "
                                f"image_pil, video_url)")
        rendered.append({"role": message["role"], "content": parts})
    return rendered, images, videos


def _url(value) -> str:
    return value["url"] if isinstance(value, dict) else value


def _image(url: str, media_root: str | None) -> Image.Image:
    if url.startswith("data:"):
        try:
            data = base64.b64decode(url.split(",", 1)[1], validate=True)
            return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        except Image.DecompressionBombError:
            raise UserError("an image_url data: URL holds a picture of more pixels than an image may have (twice "
                            "PIL's decompression-bomb limit); shrink it first") from None
        except (IndexError, binascii.Error, OSError, ValueError):
            raise UserError("an image_url data: URL does not hold a base64 image (data:image/png;base64,...)") from None
    from vllm_utils.multimodal.image import load_image

    return load_image(_local(url, media_root), fix="give a data: URL, or a file inside allowed_local_media_path")


def _video(url: str, media_root: str | None):
    from vllm_utils.multimodal.video import DEFAULT_NUM_FRAMES, load_video

    return load_video(_local(url, media_root), DEFAULT_NUM_FRAMES, at_most=True)


def _local(url: str, media_root: str | None) -> str:
    """The file a `file://` URL or a path names, if it lies inside `media_root` (as vLLM's allowed_local_media_path
    requires)."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise UserError(f"'{url[:80]}' would be downloaded, and nothing is here: give a data: URL or a local file")
    path = unquote(parsed.path) if parsed.scheme == "file" else url
    if media_root is None:
        raise UserError(f"the local file '{path}' is read only inside LLM(allowed_local_media_path=...); set it to "
                        f"the folder holding your media")
    root, full = os.path.realpath(media_root), os.path.realpath(path)
    if os.path.commonpath([root, full]) != root:
        raise UserError(f"'{path}' lies outside allowed_local_media_path '{media_root}'")
    return full
