"""URLs of the demo project."""

from django.urls import path, re_path

from . import views

urlpatterns = [
    path("articles/<int:number>/", views.article),
    path("api/items", views.api_items),
    path("healthz", views.healthz),
    re_path(r"^echo/", views.echo),
    path("async/<int:number>/", views.async_article),
]
