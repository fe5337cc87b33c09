"""arxiv_search: papers from arXiv's public API (an Atom feed), through an injectable httpx client.

API: GET {base_url}?search_query=all:<query>&start=0&max_results=<n>&sortBy=relevance returns an
Atom 1.0 feed, one <entry> per paper (id, title, summary, published, author/name, link), see
https://info.arxiv.org/help/api/user-manual.html. arXiv reports a bad query as a single entry whose
id is an .../api/errors#... URL. Without a network the call ends as a ToolError that says so.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Annotated, Any

import httpx

from vlchat.agent.tools import Schema, Tool, ToolError

ATOM = "{http://www.w3.org/2005/Atom}"
ARXIV_API = "https://export.arxiv.org/api/query"


@dataclass(frozen=True)
class ArxivConfig:
    base_url: str = ARXIV_API
    timeout_s: float = 15.0  # per HTTP request
    max_summary_chars: int = 600  # abstracts are cut to this (the observation must stay short)


@dataclass(frozen=True)
class Paper:
    arxiv_id: str  # e.g. "2304.10592v2"
    title: str
    authors: list[str]
    published: str  # YYYY-MM-DD
    summary: str
    url: str


class ArxivClient:
    """Searches arXiv with `http` (an httpx.Client; tests pass one aimed at a local fake)."""

    def __init__(self, config: ArxivConfig | None = None, http: httpx.Client | None = None) -> None:
        self.config = config or ArxivConfig()
        self.http = http or httpx.Client(timeout=self.config.timeout_s, follow_redirects=True)

    def search(self, query: str, max_results: int = 5) -> list[Paper]:
        params = {"search_query": f"all:{query}", "start": 0, "max_results": max_results, "sortBy": "relevance"}
        try:
            response = self.http.get(self.config.base_url, params=params, timeout=self.config.timeout_s)
        except (httpx.ConnectError, httpx.ConnectTimeout) as err:
            raise ToolError(f"offline: arXiv cannot be reached ({_reason(err)})") from None
        except httpx.TimeoutException:
            raise ToolError(f"arXiv did not answer within {self.config.timeout_s:g} s") from None
        except httpx.HTTPError as err:
            raise ToolError(f"arXiv request failed: {_reason(err)}") from None
        if response.status_code != 200:
            raise ToolError(f"arXiv answered HTTP {response.status_code}")
        return parse_feed(response.content, self.config.max_summary_chars)


def parse_feed(xml: bytes, max_summary_chars: int = 600) -> list[Paper]:
    """Atom feed bytes -> papers, in the feed's order."""
    try:
        root = ET.fromstring(xml)  # expat refuses entity-expansion bombs (Python >= 3.11 bundles 2.4+)
    except ET.ParseError as err:
        raise ToolError(f"arXiv's answer is not a readable Atom feed ({err})") from None
    papers = []
    for entry in root.iter(f"{ATOM}entry"):
        url = _text(entry, "id")
        if "/api/errors" in url:  # arXiv's way of reporting a malformed query
            raise ToolError(f"arXiv rejected the query: {_text(entry, 'summary')}")
        summary = _text(entry, "summary")
        if len(summary) > max_summary_chars:
            summary = summary[:max_summary_chars].rsplit(" ", 1)[0] + " …"
        papers.append(
            Paper(
                arxiv_id=url.rsplit("/abs/", 1)[-1],
                title=_text(entry, "title"),
                authors=[_text(a, "name") for a in entry.findall(f"{ATOM}author")],
                published=_text(entry, "published")[:10],
                summary=summary,
                url=url,
            )
        )
    return papers


def _text(element: ET.Element, tag: str) -> str:
    found = element.find(f"{ATOM}{tag}")
    return re.sub(r"\s+", " ", found.text or "").strip() if found is not None else ""


def _reason(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def arxiv_search_tool(config: ArxivConfig | None = None, client: ArxivClient | None = None) -> Tool:
    client = client or ArxivClient(config)

    def arxiv_search(query: str, max_results: Annotated[int, Schema(minimum=1, maximum=20)] = 5) -> dict[str, Any]:
        """Search arXiv's papers (needs internet): titles, authors, dates and abstracts.

        Args:
            query: search words.
            max_results: how many papers.
        """
        papers = client.search(query, max_results)
        return {"query": query, "papers": [vars(p) for p in papers]}

    return Tool.from_function(arxiv_search, timeout_s=client.config.timeout_s + 5)
