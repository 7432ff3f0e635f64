"""URLs of the demo project."""

from django.urls import path

from . import views

urlpatterns = [
    path("articles/<int:number>/", views.article),
    path("api/items", views.api_items),
    path("healthz", views.healthz),
]
