"""The TRAINING pool of user-defined functions for "tools:functions" (train/data_tools.py).

Each family is a function spec (as a client sends it under `tools`) and a request maker: from a
seeded rng, the arguments and one English or Chinese request that asks for exactly them. The
evaluation uses its own held-out families (flights, hotels, movies, package tracking, time zones,
calendar events, music, taxis, dictionary definitions, news), which are deliberately absent here.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlchat.chat.tools import ToolSpec

Request = tuple[dict[str, Any], str]  # (arguments, the user's request)


@dataclass(frozen=True)
class FunctionFamily:
    spec: ToolSpec
    make: Callable[[random.Random, str], Request]  # (rng, "en" | "zh") -> (arguments, request)


def _schema(properties: dict[str, dict], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


STRING = {"type": "string"}

CITIES_EN = ("Paris", "Tokyo", "London", "Berlin", "Madrid", "Toronto", "Sydney", "Cairo", "Oslo", "Lima", "Seoul")
CITIES_ZH = ("北京", "上海", "广州", "深圳", "杭州", "成都", "南京", "西安", "武汉")
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CNY", "CAD", "CHF", "AUD")
TICKERS = ("AAPL", "MSFT", "TSLA", "NVDA", "AMZN", "GOOG", "IBM", "META")
LANGUAGES = (("French", "法语"), ("German", "德语"), ("Spanish", "西班牙语"), ("Japanese", "日语"), ("English", "英语"))
PHRASES_EN = ("good morning", "thank you very much", "where is the station", "I like green tea", "see you tomorrow")
PHRASES_ZH = ("早上好", "非常感谢", "车站在哪里", "我喜欢绿茶", "明天见")
INGREDIENTS = (("chicken", "鸡肉"), ("tofu", "豆腐"), ("mushrooms", "蘑菇"), ("eggs", "鸡蛋"), ("salmon", "三文鱼"))
RESTAURANTS = ("Luigi's", "The Green Fork", "Golden Dragon", "Sakura House", "Blue Door Bistro")
NAMES = ("alice@example.com", "bob@example.com", "team@example.org", "li.wei@example.cn", "sam@example.net")
SUBJECTS = (("meeting notes", "会议记录"), ("the quarterly report", "季度报告"), ("lunch on Friday", "周五午餐"))
ROOMS = (("kitchen", "厨房"), ("bedroom", "卧室"), ("living room", "客厅"), ("office", "办公室"))
UNITS = (
    ("kilometers", "miles", "公里", "英里"),
    ("kilograms", "pounds", "公斤", "磅"),
    ("liters", "gallons", "升", "加仑"),
)
COUNTRIES = (("Brazil", "巴西"), ("Canada", "加拿大"), ("Japan", "日本"), ("Kenya", "肯尼亚"), ("Norway", "挪威"))
ITEMS = (("apples", "苹果"), ("milk", "牛奶"), ("bread", "面包"), ("rice", "大米"), ("coffee", "咖啡"))


def _time(rng: random.Random) -> str:
    return f"{rng.randint(6, 21):02d}:{rng.choice((0, 15, 30, 45)):02d}"


def _weather(rng: random.Random, lang: str) -> Request:
    unit = rng.choice(("celsius", "fahrenheit"))
    if lang == "zh":
        city = rng.choice(CITIES_ZH)
        unit_zh = "摄氏度" if unit == "celsius" else "华氏度"
        return {"city": city, "unit": unit}, rng.choice(
            (f"{city}现在天气怎么样？用{unit_zh}。", f"查一下{city}的天气，单位{unit_zh}。")
        )
    city = rng.choice(CITIES_EN)
    return {"city": city, "unit": unit}, rng.choice(
        (
            f"What's the weather like in {city} right now, in {unit}?",
            f"Tell me the weather in {city} ({unit}).",
            f"How warm is it in {city} today? Use {unit}.",
        )
    )


def _currency(rng: random.Random, lang: str) -> Request:
    amount = rng.choice((rng.randint(5, 2000), round(rng.uniform(1, 500), 2)))
    source, target = rng.sample(CURRENCIES, 2)
    args = {"amount": amount, "from_currency": source, "to_currency": target}
    if lang == "zh":
        return args, rng.choice((f"把{amount} {source}换算成{target}。", f"{amount} {source}等于多少{target}？"))
    return args, rng.choice(
        (
            f"Convert {amount} {source} to {target}.",
            f"How much is {amount} {source} in {target}?",
            f"I have {amount} {source}; what is that in {target}?",
        )
    )


def _book_table(rng: random.Random, lang: str) -> Request:
    restaurant, time, people = rng.choice(RESTAURANTS), _time(rng), rng.randint(1, 10)
    args = {"restaurant": restaurant, "time": time, "people": people}
    if lang == "zh":
        return args, f"帮我在{restaurant}订一张{time}的桌子，{people}个人。"
    return args, rng.choice(
        (
            f"Book a table at {restaurant} for {people} at {time}.",
            f"Can you reserve {restaurant} for {people} people at {time}?",
        )
    )


def _send_email(rng: random.Random, lang: str) -> Request:
    to, (subject_en, subject_zh) = rng.choice(NAMES), rng.choice(SUBJECTS)
    if lang == "zh":
        return {"to": to, "subject": subject_zh}, f"给{to}发一封邮件，主题是“{subject_zh}”。"
    return {"to": to, "subject": subject_en}, rng.choice(
        (f"Send an email to {to} with the subject {subject_en}.", f"Email {to} about {subject_en}.")
    )


def _stock_price(rng: random.Random, lang: str) -> Request:
    ticker = rng.choice(TICKERS)
    if lang == "zh":
        return {"ticker": ticker}, rng.choice((f"{ticker}的股价是多少？", f"查一下{ticker}现在的股价。"))
    return {"ticker": ticker}, rng.choice(
        (
            f"What is the stock price of {ticker}?",
            f"How is {ticker} trading right now?",
            f"Get me the {ticker} share price.",
        )
    )


def _translate(rng: random.Random, lang: str) -> Request:
    target_en, target_zh = rng.choice(LANGUAGES)
    if lang == "zh":
        text = rng.choice(PHRASES_ZH)
        return {"text": text, "target_language": target_en}, f"把“{text}”翻译成{target_zh}。"
    text = rng.choice(PHRASES_EN)
    return {"text": text, "target_language": target_en}, rng.choice(
        (f"Translate '{text}' into {target_en}.", f"How do you say '{text}' in {target_en}?")
    )


def _set_alarm(rng: random.Random, lang: str) -> Request:
    time = _time(rng)
    if lang == "zh":
        return {"time": time}, rng.choice((f"设一个{time}的闹钟。", f"明天{time}叫醒我。"))
    return {"time": time}, rng.choice((f"Set an alarm for {time}.", f"Wake me up at {time} tomorrow."))


def _recipes(rng: random.Random, lang: str) -> Request:
    en, zh = rng.choice(INGREDIENTS)
    if lang == "zh":
        return {"ingredient": zh}, f"有什么用{zh}做的菜谱？"
    return {"ingredient": en}, rng.choice((f"Find me recipes with {en}.", f"What can I cook with {en}?"))


def _tip(rng: random.Random, lang: str) -> Request:
    bill, percent = round(rng.uniform(10, 300), 2), rng.choice((10, 12, 15, 18, 20, 25))
    args = {"bill_amount": bill, "tip_percent": percent}
    if lang == "zh":
        return args, f"账单是{bill}元，按{percent}%算小费是多少？"
    return args, rng.choice(
        (f"Calculate a {percent}% tip on a bill of {bill}.", f"What's the tip at {percent}% on {bill}?")
    )


def _lights(rng: random.Random, lang: str) -> Request:
    (en, zh), on = rng.choice(ROOMS), rng.random() < 0.6
    if lang == "zh":
        return {"room": zh, "on": on}, f"{'打开' if on else '关掉'}{zh}的灯。"
    return {"room": en, "on": on}, f"Turn {'on' if on else 'off'} the lights in the {en}."


def _convert_units(rng: random.Random, lang: str) -> Request:
    source, target, source_zh, target_zh = rng.choice(UNITS)
    value = rng.randint(1, 500)
    args = {"value": value, "from_unit": source, "to_unit": target}
    if lang == "zh":
        return args, f"{value}{source_zh}是多少{target_zh}？"
    return args, rng.choice((f"Convert {value} {source} to {target}.", f"How many {target} is {value} {source}?"))


def _population(rng: random.Random, lang: str) -> Request:
    en, zh = rng.choice(COUNTRIES)
    if lang == "zh":
        return {"country": en}, f"{zh}有多少人口？"
    return {"country": en}, rng.choice((f"What is the population of {en}?", f"How many people live in {en}?"))


def _shopping(rng: random.Random, lang: str) -> Request:
    (en, zh), quantity = rng.choice(ITEMS), rng.randint(1, 6)
    if lang == "zh":
        return {"item": zh, "quantity": quantity}, f"把{quantity}份{zh}加到购物清单。"
    return {"item": en, "quantity": quantity}, rng.choice(
        (f"Add {quantity} {en} to my shopping list.", f"Put {en} on the shopping list, {quantity} of them.")
    )


def _thermostat(rng: random.Random, lang: str) -> Request:
    degrees = rng.randint(16, 28)
    if lang == "zh":
        return {"temperature": degrees}, f"把空调温度调到{degrees}度。"
    return {"temperature": degrees}, rng.choice(
        (f"Set the thermostat to {degrees} degrees.", f"Make it {degrees} degrees in here.")
    )


def _family(name: str, description: str, properties: dict, required: list[str], make) -> FunctionFamily:
    return FunctionFamily(ToolSpec(name, description, _schema(properties, required)), make)


FAMILIES: tuple[FunctionFamily, ...] = (
    _family(
        "get_weather",
        "Get the current weather in a city.",
        {"city": STRING, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        ["city"],
        _weather,
    ),
    _family(
        "convert_currency",
        "Convert an amount of money from one currency to another.",
        {"amount": {"type": "number"}, "from_currency": STRING, "to_currency": STRING},
        ["amount", "from_currency", "to_currency"],
        _currency,
    ),
    _family(
        "book_table",
        "Reserve a table at a restaurant.",
        {"restaurant": STRING, "time": STRING, "people": {"type": "integer"}},
        ["restaurant", "time", "people"],
        _book_table,
    ),
    _family("send_email", "Send an email.", {"to": STRING, "subject": STRING}, ["to", "subject"], _send_email),
    _family(
        "stock_price",
        "Get the latest price of a stock by its ticker symbol.",
        {"ticker": STRING},
        ["ticker"],
        _stock_price,
    ),
    _family(
        "translate",
        "Translate text into another language.",
        {"text": STRING, "target_language": STRING},
        ["text", "target_language"],
        _translate,
    ),
    _family("set_alarm", "Set an alarm clock.", {"time": STRING}, ["time"], _set_alarm),
    _family("search_recipes", "Find recipes that use an ingredient.", {"ingredient": STRING}, ["ingredient"], _recipes),
    _family(
        "calculate_tip",
        "Work out the tip for a bill.",
        {"bill_amount": {"type": "number"}, "tip_percent": {"type": "number"}},
        ["bill_amount", "tip_percent"],
        _tip,
    ),
    _family(
        "control_lights",
        "Switch the lights of a room on or off.",
        {"room": STRING, "on": {"type": "boolean"}},
        ["room", "on"],
        _lights,
    ),
    _family(
        "convert_units",
        "Convert a value between units of measurement.",
        {"value": {"type": "number"}, "from_unit": STRING, "to_unit": STRING},
        ["value", "from_unit", "to_unit"],
        _convert_units,
    ),
    _family("get_population", "Look up the population of a country.", {"country": STRING}, ["country"], _population),
    _family(
        "add_to_shopping_list",
        "Add an item to the shopping list.",
        {"item": STRING, "quantity": {"type": "integer"}},
        ["item", "quantity"],
        _shopping,
    ),
    _family(
        "set_thermostat",
        "Set the thermostat's target temperature in degrees Celsius.",
        {"temperature": {"type": "integer"}},
        ["temperature"],
        _thermostat,
    ),
)
