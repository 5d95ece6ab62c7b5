#!/bin/sh
# Host discovery for tests/test_elastic.py: the hosts ("name:slots", one a line) are whatever the file named by
# $HC_ELASTIC_HOSTS holds now; tests/distributed/elastic.py rewrites it to remove and add workers.
# localhost and 127.0.0.1 are two "hosts" on this machine, so dropping one drops its workers.
exec cat "$HC_ELASTIC_HOSTS"
