"""The words of the synthetic scenes (vlchat/train/synth.py): Chinese vocabulary, question
phrasings per language and question type, and the caption instructions."""

from __future__ import annotations

ZH = {
    "circle": "圆形",
    "square": "正方形",
    "triangle": "三角形",
    "star": "星形",
    "heart": "心形",
    "cross": "十字形",
    "diamond": "菱形",
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "purple": "紫色",
    "orange": "橙色",
    "black": "黑色",
    "white": "白色",
    "small": "小",
    "large": "大",
    "left": "左边",
    "right": "右边",
    "top": "上面",
    "bottom": "下面",
    "centre": "中间",
    "yes": "是",
    "no": "否",
}
EN_WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}

PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "colour": (
            "What colour is the {shape}?",
            "Which colour does the {shape} have?",
            "Tell me the colour of the {shape}.",
            "What is the colour of the {shape}?",
        ),
        "shape": ("What shape is {where}?", "Which shape can you see {where}?", "What is the shape {where}?"),
        "count": (
            "How many shapes are there?",
            "How many objects are in the image?",
            "Count the shapes in this image.",
        ),
        "position": (
            "Where is the {colour} {shape}?",
            "In which part of the image is the {colour} {shape}?",
            "Where can you find the {colour} {shape}?",
        ),
        "exists": (
            "Is there a {colour} {shape}?",
            "Does the image contain a {colour} {shape}?",
            "Can you see a {colour} {shape}?",
        ),
        "word": (
            "What word is written in the image?",
            "Which word appears in the picture?",
            "Read the word in this image.",
        ),
        "size": (
            "Is the {shape} small or large?",
            "What size is the {shape}?",
            "How big is the {shape}: small or large?",
        ),
    },
    "zh": {
        "colour": ("{shape}是什么颜色的？", "图中的{shape}是什么颜色？", "请告诉我{shape}的颜色。"),
        "shape": ("{where}是什么形状？", "图中{where}的图形是什么形状？", "{where}画的是什么形状？"),
        "count": ("图中有几个图形？", "一共有多少个形状？", "请数一数图中有几个图形。"),
        "position": ("{colour}的{shape}在哪里？", "{colour}{shape}在图中的什么位置？", "哪里有{colour}的{shape}？"),
        "exists": ("图中有{colour}的{shape}吗？", "有没有{colour}{shape}？", "你能看到{colour}的{shape}吗？"),
        "word": ("图中写的是什么单词？", "图片上写着什么字？", "图中写了哪个单词？"),
        "size": ("{shape}是大的还是小的？", "图中的{shape}是大还是小？", "{shape}的大小是大还是小？"),
    },
}

# The four prompts of MiniGPT-4's prompts/alignment.txt, two short ones, and Chinese counterparts.
INSTRUCTIONS = {
    "en": (
        "Describe this image.",
        "Describe this image in detail.",
        "Take a look at this image and describe what you notice.",
        "Could you describe the contents of this image for me?",
        "Please provide a detailed description of the picture.",
        "What is in this image?",
    ),
    "zh": (
        "描述这张图片。",
        "请详细描述这张图片。",
        "看看这张图片，描述一下你注意到了什么。",
        "你能为我描述一下这张图片的内容吗？",
        "请详细描述图中的内容。",
        "这张图片里有什么？",
    ),
}
