package fn

import (
	"fmt"
	"strings"
)

// MaxListBytes is the most the instance's image list (the ConfigMap's images.txt) may hold. The
// API server refuses a ConfigMap over 1 MiB (1,048,576 bytes); 1,000,000 leaves the difference
// for the rest of the object (the key, the name, labels and annotations), so that an accepted
// list never makes a refused object.
const MaxListBytes = 1_000_000

// ClientSideApplyListBytes is the list size above which the function warns: client-side
// `kubectl apply` copies the whole object into the annotation
// kubectl.kubernetes.io/last-applied-configuration, and an object's annotations hold at most
// 256 KiB. 200 KiB leaves room for the rest of the ConfigMap and for JSON's escaping of the
// list's newlines.
const ClientSideApplyListBytes = 200 << 10

// listPart is what one field adds to the image list, in bytes.
type listPart struct {
	field string
	bytes int
}

// checkListSize applies the size rule to the list made of parts, whatever field the bytes come
// from: an error above MaxListBytes, a warning above ClientSideApplyListBytes unless warn is
// false. The result is on the field that adds the most. It reports whether the list fits.
func checkListSize(r *reporter, parts []listPart, warn bool) bool {
	total, largest := 0, listPart{}
	var each []string
	for _, p := range parts {
		if p.bytes == 0 {
			continue
		}
		total += p.bytes
		if p.bytes > largest.bytes {
			largest = p
		}
		each = append(each, fmt.Sprintf("%s %d", p.field, p.bytes))
	}
	what := fmt.Sprintf("the image list is %d bytes", total)
	if len(each) > 1 {
		what += " (" + strings.Join(each, ", ") + ")"
	}
	switch {
	case total > MaxListBytes:
		r.errorf(largest.field, "", "%s, over the limit of %d bytes: the API server refuses a ConfigMap over 1 MiB "+
			"with its metadata; split the images across instances", what, MaxListBytes)
		return false
	case warn && total > ClientSideApplyListBytes:
		r.warnf(largest.field, "", "%s, over %d KiB: client-side `kubectl apply` fails on its ConfigMap "+
			"(the last-applied-configuration annotation holds at most 256 KiB); apply with `kubectl apply --server-side`, "+
			"or Flux, or Argo CD with ServerSideApply=true", what, ClientSideApplyListBytes>>10)
	}
	return true
}

// imagesBytes is what spec.images adds to the list: each reference and its newline.
func imagesBytes(images []string) int {
	n := 0
	for _, img := range images {
		n += len(img) + 1
	}
	return n
}
