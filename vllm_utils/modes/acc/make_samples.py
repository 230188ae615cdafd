"""Builds the bundled samples in `samples/`: synthetic pictures (shapes, and digits in PIL's default font for the
document sample) and short clips of moving shapes (encoded with PyAV) with questions and answers written for them,
one folder per format in its published layout. Run `python -m vllm_utils.modes.acc.make_samples` to rebuild them."""
import io
import json
import os

from PIL import Image, ImageDraw

from vllm_utils.modes.acc.bundled import SAMPLES_DIR


def shape(kind: str, colour: str, background: str = "white", size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    box = (12, 12, size - 12, size - 12)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(size // 2, 10), (size - 10, size - 10), (10, size - 10)], fill=colour)
    return image


def document(lines: list[str], width: int = 160) -> Image.Image:
    image = Image.new("RGB", (width, 20 + 16 * len(lines)), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((8, 8 + 16 * i), line, fill="black")
    return image


def png(image: Image.Image) -> dict:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return {"bytes": buf.getvalue(), "path": None}


def write_parquet(rows: list[dict], features: dict, path: str) -> None:
    import datasets

    os.makedirs(os.path.dirname(path), exist_ok=True)
    columns = {name: [row.get(name) for row in rows] for name in features}
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(path)


def jsonl(folder: str) -> None:
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    pictures = {"red_circle.png": shape("circle", "red"), "blue_square.png": shape("square", "blue"),
                "invoice.png": document(["INVOICE 4721", "TOTAL 38"])}
    for name, image in pictures.items():
        image.save(os.path.join(folder, "images", name), optimize=True)
    rows = [
        {"id": "circle", "image": "images/red_circle.png", "question": "Describe the picture.",
         "answer": "A red circle on a white background."},
        {"id": "square", "image": "images/blue_square.png", "question": "Which shape is in the picture?",
         "choices": ["circle", "square", "triangle"], "answer": "square"},
        {"id": "invoice", "image": "images/invoice.png", "question": "What is the invoice number?",
         "answers": ["4721"], "metric": "anls"},
    ]
    with open(os.path.join(folder, "sample.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def write_clip(frames: list[Image.Image], path: str, fps: int = 4) -> None:
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_image(frame)))
        out.mux(stream.encode())


def clip(draw_frame, count: int = 12, size: tuple[int, int] = (96, 64)) -> list[Image.Image]:
    """`count` frames, each drawn by `draw_frame(draw, i, count)` on white."""
    frames = []
    for i in range(count):
        image = Image.new("RGB", size, "white")
        draw_frame(ImageDraw.Draw(image), i, count)
        frames.append(image)
    return frames


def videomme(folder: str) -> None:
    """Video-MME's layout: `videomme/test-00000-of-00001.parquet` and the videos in `data/<videoID>.mp4`."""
    import datasets

    def moving(draw, i, n):  # a red circle crossing from left to right
        x = 8 + i * (96 - 32) // (n - 1)
        draw.ellipse((x, 20, x + 16, 36), fill="red")

    def turning(draw, i, n):  # a square, blue then yellow
        draw.rectangle((32, 16, 64, 48), fill="blue" if i < n // 2 else "yellow")

    def counting(draw, i, n):  # black dots appearing, one more every third of the clip
        for d in range(1 + 3 * i // n):
            draw.ellipse((14 + 26 * d, 26, 26 + 26 * d, 38), fill="black")

    clips = {"synthMoving01": moving, "synthColour02": turning, "synthCounts03": counting}
    for video_id, draw_frame in clips.items():
        write_clip(clip(draw_frame), os.path.join(folder, "data", f"{video_id}.mp4"))
    videos = [("001", "short", "Knowledge", "Geography", "synthMoving01"),
              ("002", "medium", "Artistic Performance", "Magic Show", "synthColour02"),
              ("003", "long", "Life Record", "Daily Life", "synthCounts03")]
    questions = {
        "001": [("Spatial Perception", "Which way does the circle move?",
                 ["A. From left to right.", "B. From right to left.", "C. From top to bottom.", "D. It stays still."],
                 "A"),
                ("Attribute Perception", "What colour is the moving shape?",
                 ["A. Blue.", "B. Green.", "C. Red.", "D. Yellow."], "C")],
        "002": [("Attribute Perception", "What colour is the square at the end of the video?",
                 ["A. Blue.", "B. Yellow.", "C. Red.", "D. Black."], "B"),
                ("Counting Problem", "How many shapes does the video show?",
                 ["A. One.", "B. Two.", "C. Three.", "D. Four."], "A")],
        "003": [("Counting Problem", "How many dots are there at the end of the video?",
                 ["A. One.", "B. Two.", "C. Three.", "D. Five."], "C"),
                ("Temporal Reasoning", "How does the number of dots change over the video?",
                 ["A. It shrinks.", "B. It grows.", "C. It stays the same.", "D. It goes up and down."], "B")],
    }
    rows = [{"video_id": vid, "duration": duration, "domain": domain, "sub_category": sub, "url": "",
             "videoID": video_id, "question_id": f"{vid}-{k + 1}", "task_type": task, "question": question,
             "options": options, "answer": answer}
            for vid, duration, domain, sub, video_id in videos
            for k, (task, question, options, answer) in enumerate(questions[vid])]
    S = datasets.Value("string")
    write_parquet(rows, {"video_id": S, "duration": S, "domain": S, "sub_category": S, "url": S, "videoID": S,
                         "question_id": S, "task_type": S, "question": S, "options": datasets.Sequence(S),
                         "answer": S},
                  os.path.join(folder, "videomme", "test-00000-of-00001.parquet"))


def fox(folder: str) -> None:
    """Fox's layout: a ground-truth JSON of LLaVA-style conversations naming pictures in the folder the benchmark
    pairs with it (en_page_ocr.json: en_pdf_png/). Two pages of text, read whole and (GOT's query) within a box."""
    os.makedirs(os.path.join(folder, "en_pdf_png"), exist_ok=True)
    pages = {"en_1.png": ["Quarterly report", "Revenue grew by 7 percent.", "Costs fell in the third quarter."],
             "en_2.png": ["Chapter 2", "The quick brown fox jumps", "over the lazy dog."]}
    for name, lines in pages.items():
        document(lines, width=240).save(os.path.join(folder, "en_pdf_png", name), optimize=True)
    rows = [{"image": name, "conversations": [{"from": "human", "value": "<image>\nOCR: "},
                                              {"from": "gpt", "value": "\n".join(lines)}]}
            for name, lines in pages.items()]
    rows.append({"image": "en_2.png", "conversations": [
        {"from": "human", "value": "<image>\n[0, 350, 1000, 1000] OCR: "},
        {"from": "gpt", "value": "\n".join(pages["en_2.png"][1:])}]})
    with open(os.path.join(folder, "en_page_ocr.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)


def main() -> None:
    import datasets

    S, I = datasets.Value("string"), datasets.Image()
    jsonl(os.path.join(SAMPLES_DIR, "jsonl"))
    write_parquet([
        {"question_id": "0", "question": "What colour is the circle?", "image": png(shape("circle", "red")),
         "category": "conv", "image_id": "red_circle", "answer": "The circle is red.",
         "caption": "A red circle on a white background."},
        {"question_id": "1", "question": "Describe the picture in detail.", "image": png(shape("triangle", "green")),
         "category": "detail", "image_id": "green_triangle",
         "answer": "A green triangle stands on a white background, pointing upwards.",
         "caption": "A green triangle on a white background."},
    ], {"question_id": S, "question": S, "image": I, "category": S, "image_id": S, "answer": S, "caption": S},
        os.path.join(SAMPLES_DIR, "llava-bench", "data", "train-00000-of-00001.parquet"))
    mmmu_features = {"id": S, "question": S, "options": S, "explanation": S,
                     **{f"image_{i}": I for i in range(1, 8)}, "img_type": S, "answer": S,
                     "topic_difficulty": S, "question_type": S, "subfield": S}
    for subject, rows in {
        "Art": [{"id": "validation_Art_1", "question": "<image 1> Which colour fills the shape?",
                 "options": "['Red', 'Blue', 'Green', 'Yellow']", "image_1": png(shape("square", "blue")),
                 "answer": "B", "question_type": "multiple-choice", "img_type": "['Diagrams']",
                 "topic_difficulty": "Easy", "subfield": "Colour", "explanation": ""}],
        "Math": [{"id": "validation_Math_1", "question": "How many corners does the shape in <image 1> have?",
                  "options": "['2', '3', '4', '5']", "image_1": png(shape("triangle", "black")), "answer": "B",
                  "question_type": "multiple-choice", "img_type": "['Diagrams']", "topic_difficulty": "Easy",
                  "subfield": "Geometry", "explanation": ""},
                 {"id": "validation_Math_2", "question": "How many sides does the shape in <image 1> have?",
                  "options": "[]", "image_1": png(shape("square", "black")), "answer": "4",
                  "question_type": "open", "img_type": "['Diagrams']", "topic_difficulty": "Easy",
                  "subfield": "Geometry", "explanation": ""}],
    }.items():
        write_parquet(rows, mmmu_features, os.path.join(SAMPLES_DIR, "mmmu", subject,
                                                        "validation-00000-of-00001.parquet"))
    L = datasets.Sequence(S)
    write_parquet([
        {"image_id": "red_circle", "question_id": 0, "question": "what colour is the circle?",
         "question_tokens": ["what", "colour", "is", "the", "circle"], "image": png(shape("circle", "red")),
         "image_width": 64, "image_height": 64, "flickr_original_url": "", "flickr_300k_url": "",
         "answers": ["red"] * 8 + ["red circle", "orange"], "image_classes": ["circle"], "set_name": "val",
         "ocr_tokens": []},
        {"image_id": "sign", "question_id": 1, "question": "what number is on the sign?",
         "question_tokens": ["what", "number", "is", "on", "the", "sign"], "image": png(document(["STOP 12"])),
         "image_width": 160, "image_height": 36, "flickr_original_url": "", "flickr_300k_url": "",
         "answers": ["12"] * 9 + ["twelve"], "image_classes": ["sign"], "set_name": "val", "ocr_tokens": ["STOP", "12"]},
    ], {"image_id": S, "question_id": datasets.Value("int64"), "question": S, "question_tokens": L, "image": I,
        "image_width": datasets.Value("int64"), "image_height": datasets.Value("int64"), "flickr_original_url": S,
        "flickr_300k_url": S, "answers": L, "image_classes": L, "set_name": S, "ocr_tokens": L},
        os.path.join(SAMPLES_DIR, "textvqa", "data", "validation-00000-of-00001.parquet"))
    write_parquet([
        {"questionId": "1", "question": "What is the invoice number?", "question_types": ["form"],
         "image": png(document(["INVOICE 4721", "DATE 03/05", "TOTAL 38.50"])), "docId": 1,
         "ucsf_document_id": "synthetic", "ucsf_document_page_no": "1", "answers": ["4721"]},
        {"questionId": "2", "question": "What is the total?", "question_types": ["form"],
         "image": png(document(["INVOICE 4721", "DATE 03/05", "TOTAL 38.50"])), "docId": 1,
         "ucsf_document_id": "synthetic", "ucsf_document_page_no": "1", "answers": ["38.50", "$38.50"]},
    ], {"questionId": S, "question": S, "question_types": L, "image": I, "docId": datasets.Value("int64"),
        "ucsf_document_id": S, "ucsf_document_page_no": S, "answers": L},
        os.path.join(SAMPLES_DIR, "docvqa", "DocVQA", "validation-00000-of-00001.parquet"))
    videomme(os.path.join(SAMPLES_DIR, "videomme"))
    fox(os.path.join(SAMPLES_DIR, "fox"))


if __name__ == "__main__":
    main()
