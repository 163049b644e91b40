package pin

import "context"

// Pin makes the record named name (as RecordName names it) carry the pin and
// this instance's ownership, as Reconcile does for each name it is asked to
// pin, but without listing the records this instance owns: for one image
// that has just become present, pinned before anything else happens on the
// node. The action is empty when the record was pinned and owned already.
func (p *Pinner) Pin(ctx context.Context, name string) (Action, error) {
	return p.pin(ctx, name, nil)
}
