"""Views of the demo project."""

import threading

from django.http import HttpResponse, JsonResponse

from produl_server.integrations.django import get_client


def article(request, number):
    # path, url and visitor_id are filled in from the request.
    get_client().track_event("article_read", {"number": number})
    return HttpResponse(f"<h1>Article {number}</h1>")


def api_items(request):
    # A JSON answer: events yes, pageviews no.
    get_client().track_event("items_listed")
    return JsonResponse({"items": []})


def healthz(request):
    return HttpResponse("ok", content_type="text/plain")


def echo(request):
    get_client().track_event("probe")
    return HttpResponse("<p>echo</p>")


async def async_article(request, number):
    # An async view: no thread hop under ASGI; the same context and visitor.
    get_client().track_event(
        "article_read",
        # uvicorn runs its event loop in the main thread.
        {"number": number, "in_loop": threading.current_thread() is threading.main_thread()},
    )
    return HttpResponse(f"<h1>Article {number}</h1>")
