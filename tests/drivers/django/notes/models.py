from django.db import models


class Author(models.Model):
    name = models.CharField(max_length=100, unique=True)


class Note(models.Model):
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="notes")
    text = models.TextField()
    stars = models.IntegerField(default=0)
    created = models.DateTimeField(auto_now_add=True)
