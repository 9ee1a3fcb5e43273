cp .fa4b/* /tmp/fa4/ && ls /tmp/fa4 | wc -l
