"""What a Django app's own tests do: the ORM in test transactions, autocommit writes read back
at once, row locks, raw SQL, unique violations, and the auth app's password hashing."""
from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, Sum
from django.test import TestCase, TransactionTestCase

from .models import Author, Note


class OrmInATestTransaction(TestCase):
    @classmethod
    def setUpTestData(cls):
        cls.ada = Author.objects.create(name="ada")
        Note.objects.bulk_create(Note(author=cls.ada, text=f"n{i}", stars=i) for i in range(10))

    def test_queries_and_aggregates(self):
        self.assertEqual(Note.objects.count(), 10)
        self.assertEqual(Note.objects.aggregate(s=Sum("stars"))["s"], 45)
        top = Author.objects.annotate(n=Count("notes")).get(name="ada")
        self.assertEqual(top.n, 10)
        self.assertEqual(list(Note.objects.filter(stars__gte=8).values_list("text", flat=True).order_by("text")), ["n8", "n9"])

    def test_update_and_delete(self):
        Note.objects.filter(stars__lt=5).update(stars=0)
        self.assertEqual(Note.objects.filter(stars=0).count(), 5)
        Note.objects.filter(stars=0).delete()
        self.assertEqual(Note.objects.count(), 5)

    def test_unique_violation_in_a_savepoint(self):
        with self.assertRaises(IntegrityError):
            with transaction.atomic():
                Author.objects.create(name="ada")
        self.assertEqual(Author.objects.count(), 1)

    def test_select_for_update(self):
        with transaction.atomic():
            note = Note.objects.select_for_update().get(text="n3")
            note.stars = 100
            note.save()
        self.assertEqual(Note.objects.get(text="n3").stars, 100)

    def test_raw_sql(self):
        with connection.cursor() as c:
            c.execute("SELECT count(*) FROM notes_note WHERE stars > %s", [4])
            self.assertEqual(c.fetchone()[0], 5)

    def test_auth_users(self):
        User.objects.create_user("grace", password="s3cret")
        self.assertTrue(User.objects.get(username="grace").check_password("s3cret"))


class AutocommitWritesReadBack(TransactionTestCase):
    """No test transaction: each write commits at once, and the next read must see it."""

    def test_read_your_writes(self):
        author = Author.objects.create(name="linus")
        for i in range(50):
            Note.objects.create(author=author, text=f"t{i}")
            self.assertEqual(Note.objects.filter(author=author).count(), i + 1)
        self.assertEqual(Author.objects.get(pk=author.pk).name, "linus")

    def test_atomic_blocks_commit_and_roll_back(self):
        with transaction.atomic():
            Author.objects.create(name="kept")
        try:
            with transaction.atomic():
                Author.objects.create(name="dropped")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        self.assertEqual(sorted(Author.objects.values_list("name", flat=True)), ["kept"])
